import sys

from launch.stack import main

sys.exit(main())
