"""The recommendation task: matrix factorisation whose user factors stay on the branch."""
