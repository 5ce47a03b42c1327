"""The generic Fabric loop and what it needs: one phase's set-up and iteration, checkpoints, phase artifacts,
run folders, the data loader, strategies and launching."""
