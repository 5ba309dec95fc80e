"""``python -m looplens``: the same CLI as the ``looplens`` console script."""

import sys

from looplens.analyses.cli import main

if __name__ == "__main__":
    sys.exit(main())
