"""`python -m mtgpt ...` is the `mtgpt` command (the DeepSpeed launcher starts ranks this way)."""

from mtgpt.cli import main

main()
