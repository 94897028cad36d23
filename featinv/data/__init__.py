"""Images in: sources (sample, folder, DIV2K), reading and preprocessing, the prepared image store."""
