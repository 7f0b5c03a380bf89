"""The console script turns on transparent huge pages for PyTorch's CPU allocator unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, moe_recipes.cli; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_huge_pages_default_on_and_user_setting_wins(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def test_cli_module_sets_it_before_importing_torch():
    code = "import sys, moe_recipes.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_building_the_command_line_imports_no_torch():
    code = "import sys, moe_recipes.cli as c; c.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
