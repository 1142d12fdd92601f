"""The LangChain tools the agent calls: thin adapters from ids and strings to engine calls."""
