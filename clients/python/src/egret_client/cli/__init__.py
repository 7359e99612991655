"""`egret`, the command line of integrators and operators (Typer, Rich)."""
