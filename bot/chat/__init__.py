"""The conversation manager and what it uses: commands, session settings, prompt, streaming."""
