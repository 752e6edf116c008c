"""Running a command where file permission bits bind, also when the tests run as root."""

from __future__ import annotations

import os
import shutil

import pytest


def unprivileged() -> list[str]:
    """A command prefix under which a folder's permission bits are obeyed: nothing for a normal user;
    for root, which ignores them, `setpriv` dropping the two capabilities that override them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made to refuse root")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
