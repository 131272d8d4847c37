"""What users run an artifact with: predict (locally and on Ray), Triton repositories, inspect."""
