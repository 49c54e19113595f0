import sys

from cqd.cli import main

sys.exit(main())
