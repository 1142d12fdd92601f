"""The agent: the LangGraph loop that chooses imgrag's tools, checkpointing, and the command line."""
