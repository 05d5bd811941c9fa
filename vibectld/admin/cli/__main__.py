"""`python -m vibectld.admin.cli` is vibectl-admin."""

from vibectld.admin.cli import main

main()
