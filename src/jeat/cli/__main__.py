"""``python -m jeat.cli``, as torchrun runs it."""

import sys

from jeat.cli import main

sys.exit(main())
