"""Models in and out: resolving what the user names (zoo, directories), saving and loading bitsmith
checkpoints, reading compressed-tensors directories, and the float skeleton models are built on."""
