import sys

from orthosae.cli import main

sys.exit(main())
