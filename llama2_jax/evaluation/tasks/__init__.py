"""lm-eval task YAMLs for local files (data paths come from lm-eval's --metadata, nothing is copied):

  piqa_local        PIQA multiple choice (acc, acc_norm), as lm-eval's `piqa`   --metadata piqa_path=FILE.jsonl
  piqa_local_gen    the same questions, greedy generation of the right solution   --metadata piqa_path=FILE.jsonl
  text_perplexity   rolling perplexity of a text file, one document per blank-line-separated paragraph
                                                                                   --metadata text_path=FILE.txt
`python -m llama2_jax.evaluate` adds this directory to lm-eval's include path.
"""

import pathlib

TASKS_DIR = pathlib.Path(__file__).resolve().parent
