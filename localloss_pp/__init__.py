"""localloss-pp: networks trained with local error signals (Nøkland & Eidnes 2019)."""
__version__ = "0.3.0"
__all__ = ["__version__"]
