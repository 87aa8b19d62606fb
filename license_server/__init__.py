"""On-premises Cryptolens license server: forwards, keeps and audits workstation licensing calls."""

__version__ = "0.1.0"
