"""Run records: run folders, provenance inside each picture, and the HTML reports."""
