"""What every stage shares: params, paths, atomic writes, the error type, the command line, devices, checkpoints."""
