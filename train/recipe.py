r"""The whole Llama 2 recipe in one command: `python -m train.recipe --config=configs/recipe_tiny.py --workdir=DIR`.

pretrain -> SFT -> helpfulness RM and safety RM -> rejection sampling -> PPO -> Ghost Attention -> safety context
distillation. An orchestrator, not a trainer: every stage runs as its own process with exactly its documented
command line (`python -m train.<stage> --config=... --workdir=DIR/<stage> --config.X=...`), so its memory is freed
and a kill -9 loses at most the work since that stage's last checkpoint. A stage dies with the recipe: stopping the
recipe (SIGTERM, Ctrl-C) stops the running stage, which saves its checkpoint, and waits for it; on Linux a recipe
killed with -9 takes its stage along too (the kernel sends the stage SIGTERM). The stage list, each stage's commands and
its product are in the config (configs/recipe_tiny.py); `{data}`, `{dir}` (the stage's workdir), `{<stage>}`
(a finished stage's product, e.g. the SFT policy) and `{policy}` (the latest finished policy) are filled in. The
optional grpo stage (GRPO with the reward-model pair) runs where config.stage_order names it: in place of PPO
(`...,rs,grpo,gatt,cd`) or after it (`...,rs,ppo,grpo,gatt,cd`); GAtt then starts from its policy.

DIR/manifest.json (written atomically) records every finished command and stage with its evaluation; a re-run skips
finished stages and re-runs the interrupted command, which resumes from its own checkpoints. After each stage its
evaluation is read from its outputs (held-out loss / perplexity, RM accuracy, RS and PPO rewards, the context
distillation's kept fraction) and, for config.eval.stages, lm-eval's PIQA is run on its product; at the end
DIR/REPORT.md has one table per stage and DIR/plots/<stage>.png its curves.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from typing import Any, Callable, NamedTuple

from absl import app, flags
from ml_collections import config_flags

from llama2_jax.cli import common as cli_common
from llama2_jax.evaluation import recipe_report
from llama2_jax.training.checks import (
    ConfigError,
    check_workdir_path,
    config_load_error,
)
from llama2_jax.training.loop import STOPPED_EXIT_STATUS
from llama2_jax.training.outputs import read_json, write_json

MANIFEST = "manifest.json"


class RecipeError(RuntimeError):
    """A stage failed or the recipe config is malformed (one line: the stage and the reason)."""


def read_manifest(workdir: str) -> dict:
    return read_json(os.path.join(workdir, MANIFEST), {"stages": {}})


def write_manifest(workdir: str, manifest: dict) -> None:
    """Written whole (tmp + rename): a kill leaves the previous manifest or the new one, never half of one."""
    write_json(os.path.join(workdir, MANIFEST), manifest)


def listed_stages(config, field: str, text: str) -> list[str]:
    """The stage names of `text`, the comma-separated value of config.<field>; a name that is no stage is an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in config.stages]
    if unknown:
        raise RecipeError(f"config.{field} names unknown stages {unknown}; known: {', '.join(config.stages)}")
    return names


def stage_names(config) -> list[str]:
    return listed_stages(config, "stage_order", config.stage_order)


class Planned(NamedTuple):
    name: str  # the manifest's key and the {name} placeholder of its product
    stage: Any  # its entry (kind, output, commands, extra)
    dir: str  # relative to DIR


ROUND_STEPS = ("pairs", "rm_helpful", "rm_safety", "rs", "ppo", "gatt", "eval")
# Stage kinds whose product is the chat policy: {policy} in a command is the product of the latest finished one.
POLICY_KINDS = ("lm", "rs", "ppo", "grpo", "gatt", "cd")
REPLACED_BY_ROUNDS = ("rs", "ppo", "gatt", "cd")  # with rlhf.rounds > 0: from config.rlhf.stages instead


def round_settings(config) -> tuple[int, int, int]:
    """(rounds, the first round with PPO, the round GAtt follows (0 = none)), checked; one-line errors."""
    r = config.rlhf
    if r.rounds < 0:
        raise RecipeError(f"config.rlhf.rounds={r.rounds} must be >= 0")
    if not 0 <= r.ppo_from_round <= r.rounds:
        raise RecipeError(f"config.rlhf.ppo_from_round={r.ppo_from_round} must be in 0..rlhf.rounds ({r.rounds}); "
                          "0 = the last round")
    if r.gatt_after_round < 0:
        raise RecipeError(f"config.rlhf.gatt_after_round={r.gatt_after_round} must be >= 0 (0 = no GAtt)")
    if r.rm_init not in ("sft", "continue"):
        raise RecipeError(f"config.rlhf.rm_init={r.rm_init!r}, expected \"sft\" or \"continue\"")
    missing = [s for s in ROUND_STEPS + ("cd",) if s not in r.stages]
    if missing:
        raise RecipeError(f"config.rlhf.stages lacks {missing}")
    return r.rounds, r.ppo_from_round or r.rounds, min(r.gatt_after_round, r.rounds)


def round_stage(template, tokens: dict[str, str]):
    """A round's stage from its template: <token>s replaced (the {placeholders} are filled when it runs)."""
    stage = template.copy_and_resolve_references()
    commands = []
    for line in template.commands:
        for token, value in tokens.items():
            line = line.replace(f"<{token}>", value)
        commands.append(line)
    with stage.unlocked():
        stage.commands = tuple(commands)
    return stage


def plan(config) -> list[Planned]:
    """The stages to run, in order. With config.rlhf.rounds = N > 0 (paper section 3.2, Figure 1) the stages of
    stage_order up to the reward models run first, then round K = 1..N: round_K_pairs (sample and label a fresh
    batch with the latest policy), round_K_rm_helpful / round_K_rm_safety (the RMs on every label so far, from the SFT
    model or continuing the previous round's: rlhf.rm_init), round_K_rs (rejection sampling with the round's RMs, its
    pool carried over from the previous round), round_K_ppo from rlhf.ppo_from_round, round_K_gatt after
    rlhf.gatt_after_round, round_K_eval (the round's figures); then cd on the latest policy. A gold_rm entry of
    config.rlhf.stages (the gold reward model of the synthetic setup) runs before the rounds. A round's stages run in
    DIR/round_K/<step>; rs, ppo, gatt and cd run only where stage_order names them (naming none of them: no rounds,
    the stages of stage_order only). Templates: config.rlhf.stages,
    whose <round> <iteration> <policy> <rm_helpful> <rm_safety>
    <rm_init_helpful> <rm_init_safety> <labels> <previous_pairs> <pool_from> are filled here."""
    names = stage_names(config)
    if not config.get("rlhf") or not config.rlhf.rounds or not set(names) & set(REPLACED_BY_ROUNDS):
        # no rounds, or a stage_order that stops before them (a prefix up to the reward models runs just that prefix)
        return [Planned(name, config.stages[name], name) for name in names]
    rounds, ppo_from, gatt_after = round_settings(config)
    if "grpo" in names:
        raise RecipeError("config.stage_order names grpo, which the RLHF rounds (config.rlhf.rounds > 0) do not run; "
                          "use it in the one-pass recipe (rlhf.rounds = 0)")
    out = [Planned(name, config.stages[name], name) for name in names if name not in REPLACED_BY_ROUNDS]
    if "gold_rm" in config.rlhf.stages:  # the synthetic setup's annotator (Gao et al. 2023), a stage of its own
        out.append(Planned("gold_rm", config.rlhf.stages.gold_rm, "gold_rm"))
    latest = {"policy": "sft", "rm_helpful": "rm_helpful", "rm_safety": "rm_safety"}
    templates = config.rlhf.stages
    for k in range(1, rounds + 1):
        previous = f"round_{k - 1}"
        tokens = {"round": str(k), "iteration": str(k - 1), "labels": f"{{round_{k}_pairs}}/preferences_all.jsonl",
                  "previous_pairs": f"--previous={{{previous}_pairs}}" if k > 1 else "",
                  "pool_from": f"--config.pool_from={{{previous}_rs}}/../pool.jsonl" if k > 1 else ""}

        def add(step: str) -> None:
            current = {**tokens, **{key: f"{{{value}}}" for key, value in latest.items()}}
            for kind in ("helpful", "safety"):
                init = "sft" if config.rlhf.rm_init == "sft" else latest[f"rm_{kind}"]
                current[f"rm_init_{kind}"] = f"{{{init}}}"
            out.append(Planned(f"round_{k}_{step}", round_stage(templates[step], current), f"round_{k}/{step}"))

        add("pairs")  # sampled by the latest policy; the RMs measured before they train on it (Figure 6)
        for kind in ("helpful", "safety"):
            add(f"rm_{kind}")
            latest[f"rm_{kind}"] = f"round_{k}_rm_{kind}"
        for step, runs in (("rs", "rs" in names), ("ppo", k >= ppo_from and "ppo" in names),
                           ("gatt", k == gatt_after and "gatt" in names)):
            if runs:
                add(step)
                latest["policy"] = f"round_{k}_{step}"
        add("eval")
    if "cd" in names:
        current = {**{key: f"{{{value}}}" for key, value in latest.items()}, "rm_init_helpful": "",
                   "rm_init_safety": ""}
        out.append(Planned("cd", round_stage(templates.cd, current), "cd"))
    return out


def fill(text: str, values: dict[str, str], stage: str) -> str:
    try:
        return text.format(**values)
    except KeyError as error:
        raise RecipeError(f"config.stages.{stage}: {{{error.args[0]}}} is not a finished stage's product or a "
                          f"known placeholder ({', '.join(sorted(values))})") from None


def stage_commands(config, name: str, values: dict[str, str], stage=None) -> list[list[str]]:
    """The stage's command lines as argv lists: `python -m MODULE ARGS...`; `extra` is appended to the last one.
    stage: the stage's entry (default config.stages[name]; the RLHF rounds' stages come from `plan`)."""
    stage = config.stages[name] if stage is None else stage
    lines = list(stage.commands)
    if stage.get("extra", ""):
        lines[-1] = f"{lines[-1]} {stage.extra}"
    return [[config.python or sys.executable, "-m", *shlex.split(fill(line, values, name))] for line in lines]


def product(stage_dir: str, output: str) -> str:
    """The stage's product: the first existing of the `|`-separated paths (relative to the stage dir)."""
    candidates = [os.path.normpath(os.path.join(stage_dir, p.strip())) for p in output.split("|")]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise RecipeError(f"none of the stage's products exists: {', '.join(candidates)}")


class Stopped(Exception):
    """The recipe got SIGTERM (raised by its handler, so that the running stage is stopped first)."""


def _raise_stopped(signum, frame):
    raise Stopped()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stage_preexec(recipe_pid: int) -> Callable[[], None]:
    """Run in the stage's process before it starts (Linux): its own process group (a terminal's Ctrl-C goes to the
    recipe, which stops the stage as below) and SIGTERM from the kernel when the recipe dies, even by kill -9
    (prctl PR_SET_PDEATHSIG): the stage saves its checkpoint and exits instead of running on, orphaned, holding its
    workdir's lock. Elsewhere only the process group."""
    def preexec() -> None:
        os.setpgid(0, 0)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != recipe_pid:  # the recipe died before prctl took effect
                os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def run_command(argv: list[str], log_path: str, env: dict) -> None:
    """One stage command; its output goes to the stage's log (appended: a re-run keeps the earlier attempt). When the
    recipe is interrupted (Ctrl-C, SIGTERM) the stage gets SIGTERM and is waited for: it saves its checkpoint."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        stage = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                 preexec_fn=_stage_preexec(os.getpid()))
        try:
            code = stage.wait()
        except BaseException:
            os.killpg(stage.pid, signal.SIGTERM)
            stage.wait()
            raise
    if code == STOPPED_EXIT_STATUS:  # the stage alone got SIGTERM (a scheduler, a user): saved, not finished
        raise RecipeError(f"`{shlex.join(argv[2:])}` was stopped by SIGTERM after saving a checkpoint; run the recipe "
                          f"again to resume it (see {log_path})")
    if code:
        raise RecipeError(f"exit status {code} from `{shlex.join(argv[2:])}`; see {log_path}")


def piqa_stages(config) -> list[str]:
    """The stages evaluated on PIQA: none without config.eval.piqa_path."""
    return listed_stages(config, "eval.stages", config.eval.stages) if config.eval.piqa_path else []


def piqa_command(config, values: dict[str, str], checkpoint: str, out_dir: str) -> list[str]:
    """`python -m llama2_jax.evaluate` on the stage's product: lm-eval's PIQA from the local JSONL, zero-shot."""
    data = os.path.abspath(fill(config.eval.piqa_path, values, "eval.piqa_path"))
    if not os.path.isfile(data):
        raise RecipeError(f"config.eval.piqa_path: no such file {data}")
    tokenizer = os.path.join(checkpoint, "tokenizer.model")
    if not os.path.isfile(tokenizer):
        raise RecipeError(f"the product {checkpoint} has no tokenizer.model to evaluate PIQA with")
    argv = [config.python or sys.executable, "-m", "llama2_jax.evaluate", f"--checkpoint={checkpoint}",
            f"--tokenizer={tokenizer}", "--tasks=piqa_local", "--num_fewshot=0", "--metadata", f"piqa_path={data}",
            f"--batch_size={config.eval.batch_size}", f"--output_path={out_dir}"]
    if config.eval.limit:
        argv.append(f"--limit={config.eval.limit}")
    return argv + shlex.split(config.eval.flags)


def run_piqa(config, values: dict[str, str], checkpoint: str, stage_dir: str, env: dict) -> dict:
    """PIQA on the stage's product; its lm-eval results JSON goes under DIR/<stage>/piqa/. Returns the figures."""
    out_dir = os.path.join(stage_dir, "piqa")
    argv = piqa_command(config, values, checkpoint, out_dir)
    print(f"[eval] {shlex.join(argv[2:])}", flush=True)
    run_command(argv, os.path.join(stage_dir, "log.txt"), {**env, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    figures = recipe_report.piqa_figures(out_dir)
    if not figures:
        raise RecipeError(f"PIQA wrote no results under {out_dir}")
    return figures


def run_stage(config, workdir: str, planned: Planned, manifest: dict, values: dict[str, str], env: dict) -> dict:
    """Run the stage's unfinished commands, then evaluate it; returns its manifest entry."""
    name, stage = planned.name, planned.stage
    stage_dir = os.path.join(workdir, planned.dir)
    os.makedirs(stage_dir, exist_ok=True)
    entry = manifest["stages"].setdefault(name, {"commands_done": 0, "seconds": 0.0})
    entry["dir"] = planned.dir
    write_manifest(workdir, manifest)
    commands = stage_commands(config, name, {**values, "dir": stage_dir}, stage)
    for index in range(entry["commands_done"], len(commands)):
        print(f"[{name}] {shlex.join(commands[index][2:])}", flush=True)
        start = time.perf_counter()
        run_command(commands[index], os.path.join(stage_dir, "log.txt"), env)
        entry["seconds"] += time.perf_counter() - start
        entry["commands_done"] = index + 1
        write_manifest(workdir, manifest)
    entry["output"] = product(stage_dir, stage.output)
    entry["kind"] = stage.kind
    metrics = recipe_report.evaluate_stage(stage.kind, stage_dir, entry["output"])
    if name in piqa_stages(config):
        if "piqa" not in entry:  # a re-run after a kill during the evaluation runs it again
            start = time.perf_counter()
            entry["piqa"] = run_piqa(config, values, entry["output"], stage_dir, env)
            entry["seconds"] += time.perf_counter() - start
            write_manifest(workdir, manifest)
        metrics.update(entry["piqa"])
    entry["metrics"] = metrics
    entry["finished"] = True
    write_manifest(workdir, manifest)
    return entry


def bind_product(values: dict, stage, name: str, output: str) -> None:
    """A finished stage's product fills {<name>}, {policy} when the stage trains the policy, and the placeholders of
    its `provides` (e.g. GRPO provides {ppo}: GAtt, which starts from {ppo}, then continues from the GRPO policy
    whether GRPO ran in place of PPO or after it)."""
    values[name] = output
    if stage.kind in POLICY_KINDS:
        values["policy"] = output
    for alias in (a.strip() for a in stage.get("provides", "").split(",")):
        if alias:
            values[alias] = output


def run_recipe(config, workdir: str) -> dict:
    """Every stage of config.stage_order not yet finished in DIR/manifest.json, then DIR/REPORT.md and plots."""
    stages = plan(config)
    names = [planned.name for planned in stages]
    os.makedirs(workdir, exist_ok=True)
    manifest = read_manifest(workdir)
    values = {"data": os.path.abspath(config.data_dir), "workdir": os.path.abspath(workdir)}
    values["paths"] = types.SimpleNamespace(**{k: fill(v, values, f"paths.{k}") for k, v in config.paths.items()})
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}  # stage logs line by line
    for planned in stages:
        name = planned.name
        entry = manifest["stages"].get(name, {})
        if entry.get("finished"):
            print(f"[{name}] finished earlier: skipped ({entry['output']})", flush=True)
        else:
            entry = run_stage(config, os.path.abspath(workdir), planned, manifest, values, env)
            print(f"[{name}] done in {entry['seconds']:.0f} s: {recipe_report.one_line(entry['metrics'])}",
                  flush=True)
        bind_product(values, planned.stage, name, entry["output"])
    recipe_report.write_report(workdir, names, manifest)
    print(f"report: {os.path.join(workdir, 'REPORT.md')}")
    return manifest


def main(argv) -> None:
    del argv
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        try:
            config = flags.FLAGS.config
            config.keys()  # a config file that failed to load raises OSError on first use
        except OSError as error:
            raise ConfigError(config_load_error(error)) from None
        check_workdir_path(flags.FLAGS.workdir)
        run_recipe(config, flags.FLAGS.workdir)
    except (RecipeError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (Stopped, KeyboardInterrupt):
        print("stopped: the running stage was stopped (a trainer saves its checkpoint first); run the same command "
              "to resume", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Recipe config (configs/recipe_*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Recipe directory: one sub-directory per stage, manifest.json, REPORT.md.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli_common.parse_config_flags)
