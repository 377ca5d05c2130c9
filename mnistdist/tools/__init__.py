"""The tools around training: evaluate, predict, plot, sweep, compare (``mnistdist <command>``).

Each command's module has ``add_arguments(parser)`` and ``main(args) -> int`` (see
``mnistdist.cli``). The tools import the core (config, training, checkpoint, rundir, plots);
the core never imports them.
"""
