"""`python -m deparrow.cli`: what the local network and the tests start."""

from deparrow.cli import main

main(prog_name="deparrow")
