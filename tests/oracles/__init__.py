"""Independent reference implementations and fixture writers used by jora's tests."""
