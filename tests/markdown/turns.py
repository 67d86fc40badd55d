#!/usr/bin/env python3
"""Reads exported conversations as GitHub's cmark does (github/cmark-gfm, through the PyPI
package cmarkgfm, pinned below), in plain CommonMark and in GitHub's flavour, raw HTML kept:
each file must show exactly its turns' headings at levels 1 and 2, no more and no fewer.

Usage: turns.py DIR HEADINGS, or turns.py --install (only install). Installs cmarkgfm into
~/.cache/smolchat/python when missing.
"""
import glob
import importlib
import os
import re
import subprocess
import sys

PIN = "cmarkgfm==2025.10.22"
LIB = os.path.expanduser("~/.cache/smolchat/python")

try:
    import cmarkgfm
except ImportError:
    sys.path.insert(0, LIB)
    try:
        import cmarkgfm
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--target", LIB, PIN],
            check=True,
        )
        # The folder did not exist when the import above looked: forget that it was missing.
        importlib.invalidate_caches()
        import cmarkgfm
from cmarkgfm.cmark import Options

if sys.argv[1:] == ["--install"]:
    print(f"{PIN} ready")
    sys.exit(0)
folder, want = sys.argv[1], int(sys.argv[2])
renderers = {
    "CommonMark": cmarkgfm.markdown_to_html,
    "GFM": cmarkgfm.github_flavored_markdown_to_html,
}
files = sorted(glob.glob(os.path.join(folder, "*.md")))
bad = 0
for path in files:
    text = open(path, encoding="utf-8").read()
    for name, render in renderers.items():
        html = render(text, options=Options.CMARK_OPT_UNSAFE)
        got = len(re.findall(r"<h[12][\s>]", html, re.IGNORECASE))
        if got != want:
            bad += 1
            if bad <= 5:
                print(f"{path} ({name}): {got} headings at levels 1-2, not {want}:\n{text!r}\n")
print(f"{len(files)} files, {bad} read otherwise")
sys.exit(1 if bad or not files else 0)
