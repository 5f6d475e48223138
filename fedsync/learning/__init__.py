"""Learning on one machine: tasks (data on this machine, model, augmentation), partitions, local training and
evaluation, devices and their diagnosis. Imports base and storage only."""
