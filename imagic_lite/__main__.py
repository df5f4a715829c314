"""`python -m imagic_lite`: what `accelerate launch -m imagic_lite batch ...` runs."""

from .cli import main

main()
