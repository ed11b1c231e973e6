import sys

from .run import chaos_main

raise SystemExit(chaos_main(sys.argv[1:]))
