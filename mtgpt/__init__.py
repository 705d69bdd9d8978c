"""mtgpt (MyTalkGPT): train your own small GPT-2-style language model and talk to it."""

__version__ = "0.1.0"
