def handle(event, context):
    """Answer one request. event: body (bytes), headers, method, query, path."""
    return {
        "statusCode": 200,
        "body": {"hello": "world", "method": event.method, "bytes": len(event.body)},
        "headers": {"Content-Type": "application/json"},
    }
