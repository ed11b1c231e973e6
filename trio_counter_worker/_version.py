__version__ = "0.1.0"
PROG = "trio-counter-worker"  # the command's name, in its messages
