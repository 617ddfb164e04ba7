"""`python -m renderer` is the `consul-renderer` command."""

import sys

from renderer.cli import main

sys.exit(main())
