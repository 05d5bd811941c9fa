"""`python -m vibectl` runs the same CLI as `vibectl`."""

from vibectl.cli import main

main()
