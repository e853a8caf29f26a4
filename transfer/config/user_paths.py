"""Paths as users type them on a command line.

A shell expands ``~`` only at the start of a word or after ``=`` in a variable assignment, so in
``data.root=~/photos`` it reaches the command unexpanded, and Hydra's override grammar rejects a
bare ``~``. Such values are read as the shell would have read them: ``~`` (or ``~user``) at the
start of a value is the home folder. A quoted value (``"data.root='~/photos'"``) reaches the
config as text and is expanded where the path is used (``Path.expanduser``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

# key=~/x, key=~, key=~user/x (not Hydra's ``~key`` deletion, which starts the override itself)
HOME_VALUE = re.compile(r"^(?P<key>[^=~][^=]*)=(?P<value>~[^/=\s]*(/.*)?)$")


def expand_home(overrides: Sequence[str]) -> list[str]:
    """``key=~/x`` overrides with the home folder written out, as a shell expands ``~/x`` alone."""
    expanded = []
    for override in overrides:
        match = HOME_VALUE.match(override)
        if match and os.path.expanduser(match["value"]) != match["value"]:
            override = f"{match['key']}={os.path.expanduser(match['value'])}"
        expanded.append(override)
    return expanded
