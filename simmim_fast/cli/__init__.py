"""The command-line layer of the CLIs: option declarations, YAML configs, argument checks. Imports no torch.

``--help`` and every argument or path error are answered from here, before the jobs (``simmim_fast.jobs``:
torch, timm, DALI) are imported. ``options`` holds the machinery, ``commands`` the option table of each
CLI, ``config`` the YAML reader, ``paths`` the path rules, ``names`` the accepted names.
"""
