"""``python -m sats`` (and ``torchrun -m sats train ...``)."""

from sats.cli import app

app()
