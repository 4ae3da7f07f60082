"""Sub-commands of the ``raddraft`` console script (see ``raddraft.cli``)."""
