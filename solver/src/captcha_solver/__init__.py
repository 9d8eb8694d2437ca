"""CAPTCHA solver worker: a CaptchaAI key from Vault, held in memory only."""

__version__ = "0.1.0"
