"""Starts ``imgrag serve`` for the browser test with the same stand-ins as ``tests/chat_launcher.py``: the
real tiny generator, judge and embedder, a scripted LLM and a folder as the reference store.

    python -m tests.serve_launcher --profile tiny --port P [serve options...]
"""

from __future__ import annotations

import sys

from tests.chat_launcher import install_fakes

if __name__ == "__main__":
    install_fakes()
    from agent.frontends.cli.app import main

    main(["serve", *sys.argv[1:]])
