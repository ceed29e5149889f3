"""The recipe's URLconf: one view that publishes a job."""

from __future__ import annotations

from django.urls import path

from examples.django_view import views

urlpatterns = [path("orders/", views.place_order)]
