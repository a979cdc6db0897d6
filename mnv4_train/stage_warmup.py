"""Imported by the stages' fork server (`mnv4_train.stages`), after its libraries, before it
forks a stage: AutoGraph's conversions of the project's graph code (`autograph_warm`), so that
no stage redoes them. Not for import elsewhere: importing it is what does the work."""

from mnv4_train import autograph_warm

autograph_warm.warm()
