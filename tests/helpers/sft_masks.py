"""SFT loss masks built independently of llama2_jax.data.sft: the tokens and target mask of a dialog from Meta's chat
strings, and a check that every packed sample of the SFT batches carries exactly those."""

import numpy as np

from helpers.messages import assistant, user
from llama2_jax.data import sft


def expected_sample(tokenizer, dialog, train_on="all"):
    """(tokens, target mask) from Meta's chat strings: BOS "[INST] u [/INST] a " EOS per turn; answers supervised."""
    messages = list(dialog)
    if messages[0]["role"] == "system":
        first = messages[1]
        messages = [user(f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{first['content']}")] + messages[2:]
    tokens, mask = [], []
    n_turns = len(messages) // 2
    for turn in range(n_turns):
        u, a = messages[2 * turn]["content"].strip(), messages[2 * turn + 1]["content"].strip()
        prompt = tokenizer.encode(f"[INST] {u} [/INST]", bos=True)
        full = tokenizer.encode(f"[INST] {u} [/INST] {a} ", bos=True, eos=True)
        assert full[: len(prompt)] == prompt
        trained = train_on == "all" or turn == n_turns - 1
        tokens += full
        mask += [0] * len(prompt) + [int(trained)] * (len(full) - len(prompt))
    return tokens, mask


def segments(batch):
    """(tokens, loss_mask of predicting token i) per packed sample of a batch."""
    for row in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            where = seg == s
            tokens = batch["inputs"][row][where].tolist()
            target_mask = batch["loss_mask"][row][where]
            np.testing.assert_array_equal(batch["targets"][row][where][:-1], tokens[1:])
            assert target_mask[-1] == 0  # no target crosses into the next sample
            assert batch["positions"][row][where].tolist() == list(range(len(tokens)))
            yield tokens, [0] + target_mask[:-1].astype(int).tolist()


def check_masks_on_batches(path, tokenizer, expected, batches=4, seq_len=1024, batch_size=4):
    data = sft.load_sft_data(path, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0, val_fraction=0.0)
    seen = set()
    for _ in range(batches):
        for tokens, mask in segments(next(data.train_iter)):
            assert tuple(tokens) in expected, "a packed sample is not one of the dialogs"
            assert mask == expected[tuple(tokens)], "loss mask differs from the assistant tokens"
            seen.add(tuple(tokens))
    assert seen == set(expected), "one epoch must show every dialog"
    return data


MULTI_TURN = [
    [user("Hi!"), assistant("Hello. How can I help?"), user("Name a colour."), assistant("Blue.")],
    [{"role": "system", "content": "Answer briefly."}, user("2 + 2?"), assistant("4"), user("And 3 + 3?"),
     assistant("6, of course."), user("Thanks"), assistant("You're welcome!")],
    [user("Say nothing else but yes."), assistant("yes")],
]
