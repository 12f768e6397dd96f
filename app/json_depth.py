"""How deeply a JSON text nests, told before any parser recurses into it.

Python's ``json`` recurses once per level of arrays and objects and raises ``RecursionError`` on
deep input (30,000 levels is a few tens of kB). Every JSON text a client sends is checked here
first: whole bodies by the body-limit middleware (``api/body_limits.py``), the ``options`` field of
an upload by the intake (``tasks/intake.py``).
"""

from __future__ import annotations

import re

MAX_JSON_DEPTH = 32  # arrays and objects inside each other; real requests nest two or three
# What decides nesting: brackets, and the quotes and backslashes that hide brackets inside strings.
_JSON_SYNTAX = re.compile(rb'[\[\]{}"\\]')


def json_nesting_exceeds(text: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``max_depth`` deep.

    A linear scan, without recursion, that stops at the first bracket past the limit. Brackets in
    strings do not count. For text that is not JSON the answer is arbitrary, and the parser that
    comes after refuses the text anyway.
    """
    depth = 0
    in_string = False
    escaped = -1  # the position a backslash inside a string escapes
    for match in _JSON_SYNTAX.finditer(text):
        position = match.start()
        char = text[position : position + 1]
        if in_string:
            if position == escaped:
                continue
            if char == b"\\":
                escaped = position + 1
            elif char == b'"':
                in_string = False
        elif char == b'"':
            in_string = True
        elif char in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif char in (b"]", b"}"):
            depth -= 1
    return False
