"""flannelctl: the command line, its views (rows, tables, YAML) and doctor.
"""
