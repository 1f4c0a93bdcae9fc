import sys

from alignlib.cli import main

sys.exit(main())
