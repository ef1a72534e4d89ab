"""`python -m fedhft.cli ...`: the `fedhft` command."""

from fedhft.cli import main

if __name__ == "__main__":
    main()
