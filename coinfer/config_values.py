"""Values of settings and flags that are more than one scalar.

Why a module: the same comma-separated syntax (edge addresses, codecs, bearer tokens) is read by
both apps and the CLIs; parsed in one place, a stray space or a trailing comma means the same
everywhere.
"""

from __future__ import annotations


def split_list(value: str) -> list[str]:
    """'a, b,,c ' -> ['a', 'b', 'c']: items of a comma-separated setting, blanks dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]
