"""train.recipe's stage processes die with it: a kill -9 of the recipe used to leave its stage running (holding the
stage workdir's lock, so a rerun failed on it). Now the kernel sends the stage SIGTERM when the recipe dies (Linux:
prctl PR_SET_PDEATHSIG), and a recipe stopped by SIGTERM or Ctrl-C stops its stage (which saves) and waits for it."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

CONFIG = '''
import ml_collections
from configs import recipe_common


def get_config():
    config = recipe_common.base_config()
    config.stage_order = "serve"
    config.stages = ml_collections.ConfigDict(
        {"serve": recipe_common.stage("lm", ".", "http.server 0 --bind 127.0.0.1 --directory {dir}")})
    return config
'''


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def start_recipe(tmp_path):
    (tmp_path / "recipe_serve.py").write_text(CONFIG)
    recipe = subprocess.Popen(
        [sys.executable, "-m", "train.recipe", f"--config={tmp_path / 'recipe_serve.py'}",
         f"--workdir={tmp_path / 'work'}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 120
    while time.time() < deadline and recipe.poll() is None:
        stages = children(recipe.pid)
        if stages and "http.server" in pathlib.Path(f"/proc/{stages[0]}/cmdline").read_text():
            return recipe, stages[0]
        time.sleep(0.1)
    recipe.kill()
    pytest.fail(f"the recipe started no stage: {recipe.communicate()[1][-2000:]}")


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_kill_9_of_the_recipe_stops_its_stage(tmp_path):
    recipe, stage = start_recipe(tmp_path)
    try:
        recipe.kill()  # SIGKILL: the recipe cannot clean up
        recipe.wait(30)
        assert wait_gone(stage, 10), "the stage outlived the recipe"
    finally:
        if alive(stage):
            os.kill(stage, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_sigterm_of_the_recipe_stops_its_stage_and_waits_for_it(tmp_path):
    recipe, stage = start_recipe(tmp_path)
    try:
        recipe.send_signal(signal.SIGTERM)
        _, err = recipe.communicate(timeout=30)
        assert not alive(stage)  # stopped and waited for before the recipe exited
        assert recipe.returncode == 1
        assert err.strip().splitlines()[-1] == ("stopped: the running stage was stopped (a trainer saves its "
                                                "checkpoint first); run the same command to resume")
    finally:
        if alive(stage):
            os.kill(stage, signal.SIGKILL)


def test_a_stage_stopped_on_its_own_is_not_counted_as_done(tmp_path):
    """A trainer stopped by SIGTERM (a scheduler's, sent to the stage alone) saves and exits with 75 (EX_TEMPFAIL);
    the recipe stops with one line saying so and does not count the command as done, so a rerun resumes it."""
    from llama2_jax.training.loop import STOPPED_EXIT_STATUS
    from train import recipe as recipe_module

    log = tmp_path / "log.txt"
    with pytest.raises(recipe_module.RecipeError) as stopped:
        recipe_module.run_command([sys.executable, "-c", f"raise SystemExit({STOPPED_EXIT_STATUS})"], str(log),
                                  dict(os.environ))
    assert str(stopped.value) == (f"`'raise SystemExit(75)'` was stopped by SIGTERM after saving a checkpoint; run the "
                                  f"recipe again to resume it (see {log})")
    with pytest.raises(recipe_module.RecipeError, match=r"^exit status 3 from `'raise SystemExit\(3\)'`"):
        recipe_module.run_command([sys.executable, "-c", "raise SystemExit(3)"], str(log), dict(os.environ))
