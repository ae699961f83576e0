"""autopose.engine"""
