import sys

from phatgoose.cli import main

sys.exit(main())
