import sys

from bnprobe.cli import main

sys.exit(main())
