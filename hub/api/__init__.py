"""The REST API: routes, request/response types, OpenAPI, sign-in, and the typed app key
(`services.SERVICES`) through which handlers reach the hub's services. Maps the domain's errors
to HTTP statuses. Imports the rooms below; never the web pages or the app factory."""
