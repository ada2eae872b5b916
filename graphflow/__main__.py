import sys

from graphflow.cli.parser import main

sys.exit(main())
