"""Safety preprompts for context distillation (Touvron et al. 2023, section 4.2.4, Tables 39-40).

The texts are data (safety_preprompts.json next to this file, or any file of the same layout): a list of generic
preprompts ("You are a safe and responsible assistant", ...) and, per risk category, a preprompt that names the
category and gives a numbered answer template (address safety concerns, address or refuse, add context or legal
alternatives, point to further information). The wording is ours, written in the spirit of the paper's tables.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

DEFAULT_PATH = os.path.join(os.path.dirname(__file__), "safety_preprompts.json")


@dataclasses.dataclass(frozen=True)
class PrepromptTable:
    generic: tuple[str, ...]  # generic safety preprompts
    category_preamble: str  # "... the risk category '{name}' ... template:" (formatted with the category name)
    categories: dict[str, dict]  # key -> {"name": display name, "template": [steps]}

    def category_preprompt(self, key: str) -> str:
        """The preamble naming the category, then its numbered answer template."""
        if key not in self.categories:
            raise ValueError(f"unknown risk category {key!r}; known: {', '.join(sorted(self.categories))}")
        category = self.categories[key]
        steps = "\n".join(f"{i}. {step}" for i, step in enumerate(category["template"], start=1))
        return f"{self.category_preamble.format(name=category['name'])}\n{steps}"

    def preprompt_for(self, index: int, category: str = "", *, use_categories: bool = True) -> str:
        """The category preprompt when the prompt has a category (and use_categories), else generic preprompt
        number `index` modulo their count (prompts cycle through the generic ones)."""
        if category and use_categories:
            return self.category_preprompt(category)
        return self.generic[index % len(self.generic)]


def load_table(path: Optional[str] = None) -> PrepromptTable:
    """The preprompt table of `path` (default: the packaged safety_preprompts.json). Malformed files raise
    ValueError naming the file and the field."""
    path = path or DEFAULT_PATH
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: {error.msg}") from None
    generic = data.get("generic")
    if not isinstance(generic, list) or not generic or not all(isinstance(g, str) and g for g in generic):
        raise ValueError(f"{path}: 'generic' must be a non-empty list of non-empty strings")
    preamble = data.get("category_preamble", "")
    if not isinstance(preamble, str) or "{name}" not in preamble:
        raise ValueError(f"{path}: 'category_preamble' must be a string containing {{name}}")
    categories = data.get("categories", {})
    if not isinstance(categories, dict):
        raise ValueError(f"{path}: 'categories' must be an object")
    for key, category in categories.items():
        template = category.get("template") if isinstance(category, dict) else None
        if not isinstance(category, dict) or not isinstance(category.get("name"), str) or not isinstance(
                template, list) or not template or not all(isinstance(step, str) for step in template):
            raise ValueError(f"{path}: categories.{key} needs a 'name' string and a non-empty 'template' list")
    return PrepromptTable(tuple(generic), preamble, categories)
